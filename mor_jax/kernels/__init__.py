"""Backend-specific kernels behind one execution policy (policy.py): custom-gradient linear, fused norm and
SwiGLU kernels (cpu_linear.py), attention (cpu_attention.py) and batch groups (batch_groups.py), tuned for
XLA:CPU. model/ calls them where the policy says so; nothing here looks at the backend."""
