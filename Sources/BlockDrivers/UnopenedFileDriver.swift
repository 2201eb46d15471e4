import BlockLayer

/// Stands in for a file that could not be opened, where only an image's
/// metadata is wanted (`ImageOptions.metadataOnly`: `img info` on a qcow2
/// whose external data file is missing, as `qemu-img info` shows one).
///
/// Why a node at all: without a data-file child the qcow2 driver would
/// take its data clusters from the image file itself, so a read would
/// answer with the image's own bytes. With this node in the child's place
/// every request fails with the error the open gave.
final class UnopenedFileDriver: BlockDriver {
    let formatName = "file"
    /// Why the file is not open.
    let error: BlockError

    init(error: BlockError) {
        self.error = error
    }

    /// Every offset is in range, so that requests reach `read` and fail
    /// instead of reading as zeroes past an end.
    var length: Int64 { Int64.max >> 1 }

    func read(at offset: Int64, into buffer: UnsafeMutableRawBufferPointer,
              flags: BlockRequestFlags, completion: @escaping BlockCompletion) {
        completion(error)
    }

    func write(at offset: Int64, from buffer: UnsafeRawBufferPointer,
               flags: BlockRequestFlags, completion: @escaping BlockCompletion) {
        completion(error)
    }

    func flush(completion: @escaping BlockCompletion) {
        completion(error)
    }
}
