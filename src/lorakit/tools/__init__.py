"""LoRA file tools: resize, extract, merge, block weights, convert (each one `lorakit` command)."""
