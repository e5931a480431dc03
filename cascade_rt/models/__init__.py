"""Model definitions: Stage C / Stage B UNet, Stage A VQGAN, CLIP text encoder and tokenizer."""
