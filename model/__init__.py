"""chat_small_t5: streaming data, model, tokenizer, trainer and checkpoints."""
