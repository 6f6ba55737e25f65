"""The learning loop: bootstrap, training data, SFT, GRPO, evaluation."""

import warnings

# TRL warns on import that it was tested with older vLLM releases; training does not use vLLM.
warnings.filterwarnings("ignore", message="TRL currently supports vLLM")
