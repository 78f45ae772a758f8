namespace AnyPrecML.Tests;

/// <summary>
/// With ANYPREC_TEST_JOURNAL set (CI sets it), every test's start and end are appended to that file, one line each with
/// the process id. A test host that dies of a signal reports no test results at all; the journal's starts without an end
/// then name the tests that were running when it died (.ci/run prints them).
/// </summary>
[TestClass]
public static class TestJournal
{
    private static readonly string? JournalPath = Environment.GetEnvironmentVariable("ANYPREC_TEST_JOURNAL");
    private static readonly Lock Gate = new();

    /// <summary>Records the start of <paramref name="context"/>'s test.</summary>
    [GlobalTestInitialize]
    public static void Started(TestContext context) => Write("start", context);

    /// <summary>Records the end of <paramref name="context"/>'s test.</summary>
    [GlobalTestCleanup]
    public static void Ended(TestContext context) => Write("end", context);

    private static void Write(string what, TestContext context)
    {
        if (string.IsNullOrEmpty(JournalPath)) return;
        string line = $"{Environment.ProcessId} {what} {context.FullyQualifiedTestClassName}.{context.TestDisplayName ?? context.TestName} {DateTime.UtcNow:HH:mm:ss.fff}\n";
        // Test processes of their own (the ISA-level children) append to the same file: a short append per line.
        lock (Gate)
            for (int attempt = 0; ; attempt++)
                try { File.AppendAllText(JournalPath, line); return; }
                catch (IOException) when (attempt < 20) { Thread.Sleep(5); }
    }
}
