"""Fine-tuning the generator on the service's own RAG prompts: data, training, evaluation."""
