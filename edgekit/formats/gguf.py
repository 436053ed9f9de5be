"""The GGUF artifact: one ``model.gguf`` (weights, tokenizer and chat template inside), run by llama.cpp."""

MODEL_FILE = "model.gguf"
