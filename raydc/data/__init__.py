"""The data plane: reading teacher traces, rendering and masking them, the Parquet schemas.

``raydc.data.ingest.run_prepare`` is the prepare stage; ``raydc.data.render`` holds the
per-row rules (pure); ``raydc.data.schema`` the column layouts. Importing this package
starts no Ray.
"""
