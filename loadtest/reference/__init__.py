"""The reference peer: the upload API on FastAPI, uvicorn and a process pool (the load-test baseline)."""
