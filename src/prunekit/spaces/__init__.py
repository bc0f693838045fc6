from .graph import Analyzer, Binding, Group, Member
from .rules import RULES

__all__ = ["Analyzer", "Binding", "Group", "Member", "RULES"]
