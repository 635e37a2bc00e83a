"""Reports of finished (or partial) runs: Markdown tables, a CSV, accuracy plots, image grids."""
from .report import summary_json, write_report

__all__ = ["summary_json", "write_report"]
