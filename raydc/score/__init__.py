"""The score stage (``stage.run_score``): every teacher token scored under the student
(and the teacher) by engine actors on Ray Data (``actors``), the teacher's values aligned
(``teacher``), the store written once (``store``). The engines themselves are
``raydc.engines``."""
