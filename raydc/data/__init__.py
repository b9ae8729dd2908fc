"""The data plane: reading teacher traces, rendering and masking them, the Parquet schemas.

``raydc.data.ingest.run_prepare`` is the prepare stage; ``raydc.data.parse`` (a row to its
candidates) and ``raydc.data.render`` (a candidate to a prepared row) hold the per-row
rules (pure); ``raydc.data.align`` puts teacher values onto student tokens;
``raydc.data.schema`` the column layouts. Importing this package starts no Ray.
"""
