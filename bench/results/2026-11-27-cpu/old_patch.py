import types
import moe_old, layers_old
from seektrain.model import moe, layers
def apply(m):
    for mod in m.modules():
        if isinstance(mod, moe.MoE):
            mod.forward = types.MethodType(moe_old.MoE.forward, mod)
        if isinstance(mod, layers.RMSNorm):
            mod.forward = types.MethodType(layers_old.RMSNorm.forward, mod)
