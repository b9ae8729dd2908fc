"""The prepare stage (``stage.run_prepare``): Ray Data reads the traces (and joins a
teacher-log-prob file, ``join``), each row becomes its candidates (``parse``), each
candidate a tokenized, masked, prepared row (``render``); bad rows go to rejects with the
reason. Importing this package starts no Ray."""
