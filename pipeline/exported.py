"""`python -m pipeline.exported`: run an exported model (see pipeline/inference/exported.py)."""

from pipeline.inference.exported import ExportedModel, main

__all__ = ["ExportedModel", "main"]

if __name__ == "__main__":
    raise SystemExit(main())
