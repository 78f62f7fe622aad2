"""The product-matching service (`product-matching/serve.py`): a FastAPI app over a trained
embedder and a FAISS gallery. `app` builds the app, `gallery` holds the index and postings,
`images` checks and decodes uploads, `embedder` wraps PyTorch or ONNX Runtime, `loading`
turns conf/serve.yaml into all of them, `page` is the HTML page."""
