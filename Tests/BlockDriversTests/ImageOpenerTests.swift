import BlockDrivers
import Testing

@Suite struct ImageOpenerTests {
    /// Backing and data file names resolve as qemu-img prints them in
    /// `full-backing-filename` (checked by hand for an image in `/`).
    @Test(arguments: [
        ("base.qcow2", "/", "/base.qcow2"),
        ("base.qcow2", "/images", "/images/base.qcow2"),
        ("../base.qcow2", "/images/vm", "/images/vm/../base.qcow2"),
        ("/other/base.qcow2", "/images", "/other/base.qcow2"),
        ("base.qcow2", "", "base.qcow2"),
    ])
    func relativeNamesResolveAgainstTheImagesDirectory(name: String, directory: String, expected: String) {
        #expect(ImageOpener.resolve(name, relativeTo: directory) == expected)
    }
}
