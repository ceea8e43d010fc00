"""Teacher signals as a typed value that comes from a live teacher or from a cache on disk."""

from drivekd.signals.live import LiveTeacher
from drivekd.signals.types import SignalNeeds, TeacherSignals, TeacherSource

__all__ = ["LiveTeacher", "SignalNeeds", "TeacherSignals", "TeacherSource"]
