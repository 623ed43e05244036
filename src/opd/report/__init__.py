"""`opd report`: a run folder's metrics and samples as one self-contained report.html (see page.py)."""

from opd.report.page import ReportError, write_report

__all__ = ["ReportError", "write_report"]
