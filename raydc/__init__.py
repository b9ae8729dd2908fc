"""raydc: distribution-corrected offline distillation of reasoning LLMs on Ray.

Importing raydc is light: it starts no Ray and imports neither vLLM nor DeepSpeed. The
method core is ``raydc.method.weights`` and ``raydc.method.loss``; the stages live in their own modules.
"""

__version__ = "0.1.0"
