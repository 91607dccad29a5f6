"""`recap report`'s page: one self-contained HTML file of a job's sample, failures, charts
and set-up (`page`), with its charts drawn as inline SVG (`charts`). Pure Python."""

from producer.report.page import ReportPage, SampleRow, render

__all__ = ["ReportPage", "SampleRow", "render"]
