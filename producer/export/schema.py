"""The export's columns (docs/ARCHITECTURE.md, "Contracts": export columns): Recap-DataComp-1B's
names first, then how each caption was made."""

from __future__ import annotations

import pyarrow as pa

EXPORT_SCHEMA = pa.schema(
    [
        ("key", pa.string()),
        ("url", pa.string()),
        ("re_caption", pa.string()),
        ("org_caption", pa.string()),
        ("sha256", pa.string()),
        ("re_length", pa.int32()),
        ("org_length", pa.int32()),
        # CLIP scores (RECAP_SCORE_MODEL), as the dataset's: null where not scored.
        ("re_clip_score", pa.float64()),
        ("org_clip_score", pa.float64()),
        ("status", pa.string()),
        ("error_class", pa.string()),
        ("error", pa.string()),
        ("width", pa.int32()),
        ("height", pa.int32()),
        ("model", pa.string()),
        ("model_revision", pa.string()),
        ("prompt", pa.string()),
        ("generation", pa.string()),
        ("flags", pa.list_(pa.string())),
        ("job", pa.string()),
        ("updated_at", pa.timestamp("us", tz="UTC")),
        # Beyond the contract's columns: how the caption was made (engine and version,
        # dtype, attention, GPU model, recap version), JSON; null for items not done.
        ("provenance", pa.string()),
    ]
)
EXPORT_COLUMNS = EXPORT_SCHEMA.names
