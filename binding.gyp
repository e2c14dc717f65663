{
  "targets": [
    {
      "target_name": "rnull_native",
      "sources": [
        "native/addon.cc",
        "native/errors.cc",
        "native/fd_ops.cc",
        "native/socket.cc",
        "native/vhost_framing.cc",
        "native/fd_watcher.cc",
        "native/guest_memory.cc",
        "native/vfio.cc",
        "native/split_ring.cc",
        "native/virtqueue.cc",
        "native/timer.cc",
        "native/page_store.cc",
        "native/sd_notify.cc",
        "native/socket_info.cc",
        "native/affinity.cc"
      ],
      "include_dirs": ["<!(node -p \"require('node-addon-api').include_dir\")"],
      "defines": ["NAPI_VERSION=8", "NAPI_DISABLE_CPP_EXCEPTIONS", "NODE_ADDON_API_DISABLE_DEPRECATED"],
      "cflags_cc": ["-std=c++17", "-O2", "-fvisibility=hidden", "-Wall", "-Wextra", "-Wno-unused-parameter"],
      "cflags_cc!": ["-fno-exceptions"]
    }
  ]
}
