"""The baselines AdaFilter is compared with that need code of their own: the L2-SP penalty and LoRA through PEFT."""
