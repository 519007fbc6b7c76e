from difflab.report.html import HtmlReport, mark

__all__ = ["HtmlReport", "mark"]
