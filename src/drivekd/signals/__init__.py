"""Teacher signals as a typed value that comes from a live teacher or from a cache on disk."""

from drivekd.signals.cache import CachedTeacher, write_cache
from drivekd.signals.live import LiveTeacher
from drivekd.signals.types import SignalNeeds, TeacherSignals, TeacherSource

__all__ = ["CachedTeacher", "LiveTeacher", "SignalNeeds", "TeacherSignals", "TeacherSource", "write_cache"]
