// swift-tools-version: 6.0
import PackageDescription

// Language mode 5: the hot path is loop-confined by design (one EventLoop per
// graph), which Swift 6's Sendable checking cannot see through NIO's
// callback APIs. Confinement is asserted at run time instead
// (`eventLoop.assertInEventLoop()`), as NIO itself does.
// Release builds drop Swift's dynamic exclusivity checks: measured with
// callgrind, they were 18% of the instructions per NBD request (every
// class-property access on the hot path). Debug builds, which run the
// tests, keep them.
let swiftSettings: [SwiftSetting] = [
    .unsafeFlags(["-enforce-exclusivity=unchecked"], .when(configuration: .release)),
]

let package = Package(
    name: "Strata",
    platforms: [.macOS(.v13)],
    products: [
        .executable(name: "strata", targets: ["strata"]),
    ],
    dependencies: [
        .package(url: "https://github.com/apple/swift-nio.git", from: "2.101.0"),
        .package(url: "https://github.com/apple/swift-argument-parser.git", from: "1.5.0"),
    ],
    targets: [
        .target(
            name: "CLinuxAIO",
            linkerSettings: [.linkedLibrary("aio")]
        ),
        .target(name: "CHugePages"),
        .target(
            name: "CCompression",
            linkerSettings: [.linkedLibrary("z"), .linkedLibrary("zstd")]
        ),
        .target(
            name: "BlockLayer",
            dependencies: [
                "CHugePages",
                .product(name: "NIOCore", package: "swift-nio"),
            ],
            swiftSettings: swiftSettings
        ),
        .target(
            name: "QCOW2",
            dependencies: [
                "BlockLayer", "CCompression",
                .product(name: "NIOCore", package: "swift-nio"),
            ],
            swiftSettings: swiftSettings
        ),
        .target(
            name: "BlockDrivers",
            dependencies: [
                "BlockLayer", "QCOW2", "CLinuxAIO",
                .product(name: "NIOCore", package: "swift-nio"),
                .product(name: "NIOPosix", package: "swift-nio"),
            ],
            swiftSettings: swiftSettings
        ),
        .target(
            name: "NBDProtocol",
            dependencies: [.product(name: "NIOCore", package: "swift-nio")],
            swiftSettings: swiftSettings
        ),
        .target(
            name: "NBDServer",
            dependencies: [
                "NBDProtocol", "BlockLayer",
                .product(name: "NIOCore", package: "swift-nio"),
                .product(name: "NIOPosix", package: "swift-nio"),
            ],
            swiftSettings: swiftSettings
        ),
        .executableTarget(
            name: "strata",
            dependencies: [
                "BlockLayer", "BlockDrivers", "NBDServer", "CLinuxAIO",
                .product(name: "NIOCore", package: "swift-nio"),
                .product(name: "NIOPosix", package: "swift-nio"),
                .product(name: "ArgumentParser", package: "swift-argument-parser"),
            ],
            swiftSettings: swiftSettings
        ),
        .target(
            name: "NBDTestSupport",
            dependencies: ["NBDProtocol", .product(name: "NIOCore", package: "swift-nio")],
            path: "Tests/NBDTestSupport"
        ),
        .testTarget(
            name: "NBDProtocolTests",
            dependencies: ["NBDProtocol", "NBDTestSupport", .product(name: "NIOCore", package: "swift-nio")]
        ),
        .testTarget(
            name: "BlockLayerTests",
            dependencies: [
                "BlockLayer",
                .product(name: "NIOCore", package: "swift-nio"),
                .product(name: "NIOPosix", package: "swift-nio"),
                .product(name: "NIOEmbedded", package: "swift-nio"),
            ]
        ),
        .testTarget(
            name: "BlockDriversTests",
            dependencies: [
                "BlockDrivers", "BlockLayer", "CLinuxAIO",
                .product(name: "NIOCore", package: "swift-nio"),
                .product(name: "NIOPosix", package: "swift-nio"),
            ]
        ),
        .testTarget(
            name: "NBDServerTests",
            dependencies: [
                "NBDServer", "NBDProtocol", "NBDTestSupport", "BlockLayer",
                .product(name: "NIOCore", package: "swift-nio"),
                .product(name: "NIOEmbedded", package: "swift-nio"),
                .product(name: "NIOPosix", package: "swift-nio"),
            ]
        ),
        .testTarget(
            name: "QCOW2Tests",
            dependencies: [
                "QCOW2", "BlockLayer",
                .product(name: "NIOCore", package: "swift-nio"),
                .product(name: "NIOEmbedded", package: "swift-nio"),
            ]
        ),
        .testTarget(
            name: "InteropTests",
            dependencies: [],
            exclude: ["Scripts"]
        ),
    ],
    swiftLanguageModes: [.v5]
)
