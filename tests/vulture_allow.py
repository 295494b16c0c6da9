"""Names the dead-code check (`make test` runs vulture) must not report: each is used, but by
a caller vulture cannot see. Listed as attribute reads, grouped by who calls them."""

# gRPC calls these servicer methods by their RPC names; grpc.aio calls interceptors'.
_.ServerLive, _.ServerReady, _.ModelReady, _.ServerMetadata, _.ModelMetadata, _.ModelConfig
_.ModelStatistics, _.RepositoryIndex, _.ModelInfer, _.ModelStreamInfer, _.StreamFrames
_.RepositoryModelLoad, _.RepositoryModelUnload
_.SystemSharedMemoryRegister, _.SystemSharedMemoryUnregister, _.SystemSharedMemoryStatus
_.CudaSharedMemoryRegister, _.CudaSharedMemoryUnregister, _.CudaSharedMemoryStatus
_.AddStream, _.ListStreams, _.GetStream, _.RemoveStream, _.PauseStream, _.ResumeStream, _.Subscribe
_.intercept_service
# NVIDIA Triton's Python backend calls the pipeline model's entry points.
_.TritonPythonModel, _.initialize, _.execute
# prometheus_client calls collectors' collect(); torch calls modules' forward().
_.collect, _.forward
# The standard library's socketserver / http.server call these on the metrics server.
_.log_message, _.handle_error, _.address_family, _.do_POST
# The import system calls these on the converter's placeholder modules (tools/convert.py).
_.create_module, _.exec_module, _.__mro_entries__
# Fields of messages and library objects, written for their owners to read.
_.server_ms, _.ns, _.thread_type, _.thread_count, _.pix_fmt, _.recompute_scale_factor, _.__path__
_.graph_optimization_level, _.intra_op_num_threads, _.inter_op_num_threads, _.pending_calls_threshold
# numba's intrinsic and Python's __mro_entries__ take these arguments by contract.
typingctx, signature, bases
