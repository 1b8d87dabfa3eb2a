"""The model: the GPT-2 the paper trains (``gpt2``) and its export in the Hugging Face format (``hf_export``)."""
