"""GGUF output (llama.cpp's file format) at the end of the merge pipeline: the merged model, streamed tensor by tensor
(`model.py`, `writer.py`), its tokenizer metadata (`vocab.py`), and the combined adapter as a llama.cpp LoRA
(`lora.py`). Importing this package imports neither torch nor gguf; `options.py` checks what a caller asked for."""
