"""dcn_det's own kernels: the deformable conv custom op (:mod:`.conv_native`) with its compiled CPU
kernel (:mod:`.extension`, ``csrc/``) and public-API path (:mod:`.conv_public`), and the deformable RoI
pooling kernel (:mod:`.roi_pool_native`)."""
