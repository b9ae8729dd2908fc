"""Plumbing every stage may use: ``artifacts`` (the stage-folder contract, the one hashing
rule, Parquet parts), ``schemas`` (the column layouts and their one writer each),
``runtime`` (connecting to Ray, log routing), ``progress`` (the console's progress bars
and lines), ``models`` (tiny models, tokenizer loading, the offline environment).
Nothing here knows a stage."""
