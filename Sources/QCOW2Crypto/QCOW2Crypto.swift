import COpenSSL

/// Namespace for the disk-encryption primitives.
public enum QCOW2Crypto {}
