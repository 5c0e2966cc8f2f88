"""The MoR language model: layers, the shared recursion block, routers, the LM."""
