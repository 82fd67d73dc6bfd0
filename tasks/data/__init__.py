"""Task data: local corpora and Hugging Face hub sources."""
