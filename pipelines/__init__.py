"""The SFT pipeline (sft_pipeline.py) and its named run configurations (configs/*.yaml)."""
