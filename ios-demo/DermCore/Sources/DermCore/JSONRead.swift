import Foundation

// MARK: - org.json's accessors, as far as the manifest needs them: the same leniency and the same failures.

/// A field of the wrong kind, with org.json's message (e.g. `JSONObject["input"] not found.`).
struct JSONFailure: Error {
    let message: String
    init(_ message: String) { self.message = message }
}

/// Values as `JSONSerialization` gives them on Darwin and on Linux (swift-corelibs-foundation): `[String: Any]`,
/// `[Any]`, `String`, `NSNull`, and `NSNumber` for numbers and booleans alike (an `NSDecimalNumber` for numbers with
/// many digits). Numbers are read through `NSNumber`, never by casting `Any` to `Double` or `Int`, which does not
/// bridge the same way on both platforms.
enum JSONRead {
    static func isNull(_ v: Any?) -> Bool {
        guard let v = v else { return true }
        return v is NSNull
    }

    static func object(_ v: Any?) -> [String: Any]? {
        guard let v = v else { return nil }
        return v as? [String: Any]
    }

    static func array(_ v: Any?) -> [Any]? {
        guard let v = v else { return nil }
        return v as? [Any]
    }

    /// JSON `true` and `false` (a CFBoolean on both platforms), as opposed to the numbers 1 and 0.
    static func isBoolean(_ n: NSNumber) -> Bool {
        #if canImport(Darwin)
        return CFGetTypeID(n) == CFBooleanGetTypeID()
        #else
        return String(cString: n.objCType) == "c"
        #endif
    }

    /// A JSON number (never a boolean) as a Double. Decimal numbers go through their digits, so that a number with
    /// 17 significant digits is the Double Python wrote.
    static func numeric(_ v: Any?) -> Double? {
        guard let v = v, let n = v as? NSNumber, !isBoolean(n) else { return nil }
        if let d = n as? NSDecimalNumber {
            return Double(d.stringValue) ?? d.doubleValue
        }
        return n.doubleValue
    }

    /// org.json's `optDouble`: a number, or a string that reads as one; nil otherwise (or NaN).
    static func number(_ v: Any?) -> Double? {
        var value: Double? = nil
        if let s = v as? String {
            let trimmed = s.trimmingCharacters(in: .whitespacesAndNewlines)
            value = trimmed.isEmpty ? nil : Double(trimmed)
        } else {
            value = numeric(v)
        }
        guard let d = value, !d.isNaN else { return nil }
        return d
    }

    /// A sensitivity or specificity: nil when null or absent (not measured), NaN when not a number.
    static func measured(_ v: Any?) -> Double? {
        return isNull(v) ? nil : (number(v) ?? Double.nan)
    }

    /// A Double truncated toward zero, as org.json's `getInt`; nil when no Int holds it.
    static func truncated(_ d: Double) -> Int? {
        guard d.isFinite, abs(d) < 9.0e18 else { return nil }
        return Int(d)
    }

    /// A value as text: a string as it is, anything else as JSON (org.json's `optString`).
    static func text(_ v: Any) -> String {
        if let s = v as? String { return s }
        if let n = v as? NSNumber {
            if isBoolean(n) { return n.boolValue ? "true" : "false" }
            let d = numeric(n) ?? n.doubleValue
            if d == d.rounded(), let i = truncated(d) { return String(i) }
            return String(d)
        }
        if v is NSNull { return "null" }
        if JSONSerialization.isValidJSONObject(v),
           let data = try? JSONSerialization.data(withJSONObject: v, options: []),
           let s = String(data: data, encoding: .utf8) {
            return s
        }
        return String(describing: v)
    }

    /// org.json's `optString(key, fallback)`: the fallback for null or absent.
    static func optString(_ v: Any?, _ fallback: String) -> String {
        guard let v = v, !(v is NSNull) else { return fallback }
        return text(v)
    }

    // The getters: a value that must be there, of one kind.

    private static func key(_ k: String) -> String { return "JSONObject[\"\(k)\"]" }

    private static func index(_ i: Int) -> String { return "JSONArray[\(i)]" }

    private static func element(_ a: [Any], _ i: Int) -> Any? {
        return i >= 0 && i < a.count ? a[i] : nil
    }

    private static func present(_ v: Any?, _ at: String) throws -> Any {
        guard let v = v, !(v is NSNull) else { throw JSONFailure("\(at) not found.") }
        return v
    }

    private static func objectValue(_ v: Any?, _ at: String) throws -> [String: Any] {
        let value = try present(v, at)
        guard let o = object(value) else { throw JSONFailure("\(at) is not a JSONObject.") }
        return o
    }

    private static func arrayValue(_ v: Any?, _ at: String) throws -> [Any] {
        let value = try present(v, at)
        guard let a = array(value) else { throw JSONFailure("\(at) is not a JSONArray.") }
        return a
    }

    private static func stringValue(_ v: Any?, _ at: String) throws -> String {
        let value = try present(v, at)
        if value is String || value is NSNumber { return text(value) }
        throw JSONFailure("\(at) is not a string.")
    }

    private static func numberValue(_ v: Any?, _ at: String) throws -> Double {
        let value = try present(v, at)
        guard let d = number(value) else { throw JSONFailure("\(at) is not a number.") }
        return d
    }

    private static func intValue(_ v: Any?, _ at: String) throws -> Int {
        let d = try numberValue(v, at)
        guard let i = truncated(d) else { throw JSONFailure("\(at) is not a number.") }
        return i
    }

    static func getObject(_ o: [String: Any], _ k: String) throws -> [String: Any] {
        return try objectValue(o[k], key(k))
    }

    static func getObject(_ a: [Any], _ i: Int) throws -> [String: Any] {
        return try objectValue(element(a, i), index(i))
    }

    static func getArray(_ o: [String: Any], _ k: String) throws -> [Any] {
        return try arrayValue(o[k], key(k))
    }

    static func getString(_ o: [String: Any], _ k: String) throws -> String {
        return try stringValue(o[k], key(k))
    }

    static func getNumber(_ o: [String: Any], _ k: String) throws -> Double {
        return try numberValue(o[k], key(k))
    }

    static func getInt(_ o: [String: Any], _ k: String) throws -> Int {
        return try intValue(o[k], key(k))
    }

    static func getInt(_ a: [Any], _ i: Int) throws -> Int {
        return try intValue(element(a, i), index(i))
    }

    /// A list of strings; empty when the field is absent or not a list.
    static func strings(_ o: [String: Any], _ k: String) throws -> [String] {
        guard let a = array(o[k]) else { return [] }
        var out: [String] = []
        out.reserveCapacity(a.count)
        for i in 0..<a.count {
            let s = try stringValue(a[i], index(i))
            out.append(s)
        }
        return out
    }
}
