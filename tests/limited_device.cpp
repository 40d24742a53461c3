// A ggml device for the tests: the CPU's own kernels behind a GPU-type device whose supports_op refuses some of
// the operations Self-Extend's faster paths use. llama.cpp offloads the layers to it (n_gpu_layers = -1), its
// probes (llama_self_extend_caps::probe) ask it, and Self-Extend takes the paths of a device without those
// operations (a GPU's), computed for real by ggml's CPU kernels. tests/native_build.py builds it and registers
// it in a child process (limited_device_register) before a model is loaded.
#include "ggml-backend-impl.h"
#include "ggml-backend.h"
#include "ggml-cpu.h"

#include <cstring>
#include <map>

// what the device refuses (limited_device_register's flags)
enum {
    REFUSE_FLASH_ATTN_EXT_LSE     = 1, // ggml_flash_attn_ext_lse
    REFUSE_MUL_MAT_CONCAT         = 2, // ggml_mul_mat_concat
    REFUSE_OUT_PROD               = 4, // ggml_out_prod
    REFUSE_FLASH_ATTN_HEAD_SIZES  = 8, // ggml_flash_attn_ext with K and V of different head sizes
};

static unsigned refused = 0;

static ggml_backend_dev_t cpu_device() {
    return ggml_backend_dev_by_type(GGML_BACKEND_DEVICE_TYPE_CPU);
}

// the CPU backends behind the device's backends, to free them
static std::map<ggml_backend_t, ggml_backend_t> cpu_backends;

static ggml_guid_t limited_guid() {
    static ggml_guid guid = { 0x6c, 0x69, 0x6d, 0x69, 0x74, 0x65, 0x64, 0x2d, 0x64, 0x65, 0x76, 0x69, 0x63, 0x65, 0x00, 0x01 };
    return &guid;
}

static void limited_backend_free(ggml_backend_t backend) {
    ggml_backend_free(cpu_backends.at(backend));
    cpu_backends.erase(backend);
    delete backend;
}

static const char * limited_dev_get_name(ggml_backend_dev_t) { return "LIMITED0"; }
static const char * limited_dev_get_description(ggml_backend_dev_t) { return "the CPU without some of Self-Extend's operations"; }

static void limited_dev_get_memory(ggml_backend_dev_t, size_t * free, size_t * total) {
    ggml_backend_dev_memory(cpu_device(), free, total);
}

static enum ggml_backend_dev_type limited_dev_get_type(ggml_backend_dev_t) { return GGML_BACKEND_DEVICE_TYPE_GPU; }

static void limited_dev_get_props(ggml_backend_dev_t dev, struct ggml_backend_dev_props * props) {
    std::memset(props, 0, sizeof(*props));
    props->name        = limited_dev_get_name(dev);
    props->description = limited_dev_get_description(dev);
    props->type        = GGML_BACKEND_DEVICE_TYPE_GPU;
    limited_dev_get_memory(dev, &props->memory_free, &props->memory_total);
}

static ggml_backend_t limited_dev_init_backend(ggml_backend_dev_t dev, const char *) {
    // the CPU backend's functions on its own context, as this device's backend
    ggml_backend_t cpu = ggml_backend_cpu_init();
    ggml_backend_t backend = new ggml_backend { limited_guid(), cpu->iface, dev, cpu->context };
    backend->iface.free = limited_backend_free;
    cpu_backends[backend] = cpu;
    return backend;
}

static ggml_backend_buffer_type_t limited_dev_get_buffer_type(ggml_backend_dev_t) {
    return ggml_backend_cpu_buffer_type();
}

static bool limited_dev_supports_op(ggml_backend_dev_t, const struct ggml_tensor * op) {
    switch (op->op) {
        case GGML_OP_FLASH_ATTN_EXT_LSE:
            if (refused & REFUSE_FLASH_ATTN_EXT_LSE) return false;
            break;
        case GGML_OP_MUL_MAT_CONCAT:
            if (refused & REFUSE_MUL_MAT_CONCAT) return false;
            break;
        case GGML_OP_OUT_PROD:
            if (refused & REFUSE_OUT_PROD) return false;
            break;
        case GGML_OP_FLASH_ATTN_EXT:
            if ((refused & REFUSE_FLASH_ATTN_HEAD_SIZES) && op->src[1]->ne[0] != op->src[2]->ne[0]) return false;
            break;
        default:
            break;
    }
    return ggml_backend_dev_supports_op(cpu_device(), op);
}

static bool limited_dev_supports_buft(ggml_backend_dev_t, ggml_backend_buffer_type_t buft) {
    return buft == ggml_backend_cpu_buffer_type();
}

static void limited_set_n_threads(ggml_backend_t backend, int n_threads) {
    ggml_backend_cpu_set_n_threads(cpu_backends.at(backend), n_threads);
}

static const char * limited_reg_get_name(ggml_backend_reg_t) { return "LIMITED"; }
static size_t limited_reg_get_device_count(ggml_backend_reg_t) { return 1; }

static ggml_backend_dev_t limited_reg_get_device(ggml_backend_reg_t reg, size_t) {
    static ggml_backend_device device = {
        /* .iface = */ {
            /* .get_name             = */ limited_dev_get_name,
            /* .get_description      = */ limited_dev_get_description,
            /* .get_memory           = */ limited_dev_get_memory,
            /* .get_type             = */ limited_dev_get_type,
            /* .get_props            = */ limited_dev_get_props,
            /* .init_backend         = */ limited_dev_init_backend,
            /* .get_buffer_type      = */ limited_dev_get_buffer_type,
            /* .get_host_buffer_type = */ nullptr,
            /* .buffer_from_host_ptr = */ nullptr,
            /* .supports_op          = */ limited_dev_supports_op,
            /* .supports_buft        = */ limited_dev_supports_buft,
            /* .offload_op           = */ nullptr,
            /* .event_new            = */ nullptr,
            /* .event_free           = */ nullptr,
            /* .event_synchronize    = */ nullptr,
        },
        /* .reg     = */ reg,
        /* .context = */ nullptr,
    };
    return &device;
}

static void * limited_reg_get_proc_address(ggml_backend_reg_t, const char * name) {
    return std::strcmp(name, "ggml_backend_set_n_threads") == 0 ? (void *) limited_set_n_threads : nullptr;
}

extern "C" void limited_device_register(unsigned flags) {
    static ggml_backend_reg reg = {
        /* .api_version = */ GGML_BACKEND_API_VERSION,
        /* .iface       = */ {
            /* .get_name         = */ limited_reg_get_name,
            /* .get_device_count = */ limited_reg_get_device_count,
            /* .get_device       = */ limited_reg_get_device,
            /* .get_proc_address = */ limited_reg_get_proc_address,
        },
        /* .context     = */ nullptr,
    };
    refused = flags;
    ggml_backend_register(&reg);
}
