"""``python -m serve --model DIR_OR_ONNX``: the HTTP server without the purifier package (no torch)."""
from .cli import serve_command

if __name__ == "__main__":
    serve_command(prog_name="python -m serve")
