.PHONY: run test venv

run:    ## caption the bundled sample (MODEL=tiny offline, or a real model id)
	scripts/run-sample.sh

test:   ## the whole test suite (starts local Postgres/Redis when needed)
	scripts/test.sh

venv:
	scripts/setup-venv.sh
