"""Report figures and the self-contained HTML report."""

from dpsynth.report.figures import montage
from dpsynth.report.html import write_report

__all__ = ["montage", "write_report"]
