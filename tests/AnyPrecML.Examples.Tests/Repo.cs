using System.Diagnostics;

namespace AnyPrecML.Examples.Tests;

/// <summary>The repository, the shared models beside it, temporary folders and child processes.</summary>
internal static class Repo
{
    public static string Root { get; } = FindRoot();

    private static string FindRoot()
    {
        for (var d = new DirectoryInfo(AppContext.BaseDirectory); d is not null; d = d.Parent)
            if (File.Exists(Path.Combine(d.FullName, "AnyPrecML.sln"))) return d.FullName;
        throw new DirectoryNotFoundException("AnyPrecML.sln not found above the test binaries.");
    }

    public static string At(params string[] parts) => Path.Combine([Root, .. parts]);

    /// <summary>../shared beside the repository, or $ANYPREC_SHARED: what the notebooks and samples default to.</summary>
    public static string Shared { get; } = Environment.GetEnvironmentVariable("ANYPREC_SHARED") is { Length: > 0 } env
        ? env : Path.Combine(Path.GetDirectoryName(Root)!, "shared");

    public static string Stories260K(string name) => Path.Combine(Shared, "models", "stories260K", name);

    /// <summary>The configuration these tests were built in: packs and file-based apps use the same.</summary>
#if DEBUG
    public const string Configuration = "Debug";
#else
    public const string Configuration = "Release";
#endif

    public static DirectoryInfo NewTempDir(string purpose) => Directory.CreateTempSubdirectory($"anyprec-{purpose}-");

    public static void Delete(DirectoryInfo dir)
    {
        try { dir.Delete(recursive: true); } catch (IOException) { } catch (UnauthorizedAccessException) { }
    }

    /// <summary>Runs a program to its end (or kills it after <paramref name="timeout"/>) and returns its exit code and output.</summary>
    public static (int Code, string Out, string Err) Run(string exe, IEnumerable<string> args, string workingDirectory,
        TimeSpan timeout, IDictionary<string, string>? env = null)
    {
        var start = new ProcessStartInfo(exe) { WorkingDirectory = workingDirectory, RedirectStandardOutput = true, RedirectStandardError = true };
        foreach (string a in args) start.ArgumentList.Add(a);
        // A child dotnet must not inherit the test host's MSBuild or test-platform settings.
        foreach (string key in new[] { "MSBuildSDKsPath", "MSBuildExtensionsPath", "MSBUILD_EXE_PATH", "DOTNET_HOST_PATH" }) start.Environment.Remove(key);
        start.Environment["DOTNET_CLI_TELEMETRY_OPTOUT"] = "1";
        start.Environment["DOTNET_NOLOGO"] = "1";
        start.Environment["ANYPREC_SHARED"] = Shared;
        if (env is not null) foreach (var (k, v) in env) start.Environment[k] = v;
        using var p = Process.Start(start)!;
        var stdout = p.StandardOutput.ReadToEndAsync();
        var stderr = p.StandardError.ReadToEndAsync();
        if (!p.WaitForExit(timeout))
        {
            p.Kill(entireProcessTree: true);
            p.WaitForExit();
            return (-1, stdout.Result, $"timed out after {timeout.TotalSeconds:F0} s\n{stderr.Result}");
        }
        return (p.ExitCode, stdout.Result, stderr.Result);
    }

    public static (int Code, string Out, string Err) Dotnet(string workingDirectory, TimeSpan timeout, IDictionary<string, string>? env, params string[] args)
        => Run("dotnet", args, workingDirectory, timeout, env);
}
