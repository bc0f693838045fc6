"""Analysis: channel spaces (``spaces``), the op rules (``rules``) and the analyzer that builds groups."""
from .analyzer import Analyzer, Binding, Group, Member
from .rules import RULES

__all__ = ["Analyzer", "Binding", "Group", "Member", "RULES"]
