"""The model layer shared by training and serving: the bundle manifest (read and write), the encoder
runtimes and the Triton model repository. It imports ``twinstream.v1`` only, never a service,
``twinstream.learn`` or ``twinstream.devstack``."""
