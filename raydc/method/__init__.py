"""The method, pure torch / Python: per-token weights (``weights``), the chunked weighted
loss (``loss``), the student's predictive entropy, exact or bounded from top-k
(``entropy``), DASD divergence-aware selection (``selection``), character spans
(``spans``) and putting teacher values onto student tokens (``align``). Nothing here
imports Ray, vLLM or DeepSpeed, or learns that it runs distributed."""
