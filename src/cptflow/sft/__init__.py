"""Supervised fine-tuning (workflow/rules/sft.smk): an optional branch after a continual pre-training stage.

conversations (validate + decontaminate multi-turn chats) → sft_pack (chat template, loss mask on every
assistant turn, packing) → finetune (LoRA / QLoRA / full, merged into full weights) → sft_release (delta
against the base + the adapter alone) → generate (greedy answers before and after SFT); the SFT model is
also scored by the evaluate stage like the base and the adapted model.
"""
