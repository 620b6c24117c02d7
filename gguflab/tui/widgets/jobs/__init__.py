"""The Jobs pane: every job's progress, the selected job's live log and its histograms."""

from .pane import BarChart, JobsPane, describe_event

__all__ = ["BarChart", "JobsPane", "describe_event"]
