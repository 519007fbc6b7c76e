from difflab.report.html import HtmlReport

__all__ = ["HtmlReport"]
