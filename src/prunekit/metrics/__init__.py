from .flops import MACS, op_macs

__all__ = ["MACS", "op_macs"]
