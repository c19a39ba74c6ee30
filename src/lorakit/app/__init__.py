"""`lorakit serve`: a local web page with the base model's and each adapter's answers side by side."""
from .workbench import BASE, Answer, Workbench

__all__ = ["BASE", "Answer", "Workbench"]
