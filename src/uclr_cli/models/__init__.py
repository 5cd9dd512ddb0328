"""Pure building blocks: embeddings, the dual-stream autoencoder, LoRA. No I/O."""
