"""Analysis: channel spaces (``spaces``), the op rules (``rules``), layer knowledge (``modules``) and the
analyzer that builds groups."""
from .analyzer import Analyzer, Binding, Group, Member
from .modules import ModuleSpec, register_module, unregister_module
from .rules import RULES

__all__ = ["Analyzer", "Binding", "Group", "Member", "ModuleSpec", "RULES", "register_module", "unregister_module"]
