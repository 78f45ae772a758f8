using AnyPrecML.Fuzz;
using SharpFuzz;

// anyprec-fuzz list                      the targets
// anyprec-fuzz seeds <dir>               writes the generated seed corpus (<dir>/<target>/...)
// anyprec-fuzz fuzz <target>             the AFL++ fork server loop (under afl-fuzz; scripts/fuzz.sh)
// anyprec-fuzz replay <target> <path>... runs files or directories of inputs once each; exit 1 when any crashes
// Instrumented code writes its coverage through SharpFuzz's trace pointer, which Fuzzer.Run points at AFL++'s shared
// memory; until then (building the workspace, the targets' statics) it writes to a scratch map instead of null.
unsafe { SharpFuzz.Common.Trace.SharedMem = (byte*)System.Runtime.InteropServices.NativeMemory.AllocZeroed(1 << 16); }

switch (args)
{
    case ["list"]:
        foreach (var t in FuzzTargets.All) Console.WriteLine($"{t.Name,-15} {t.What}");
        return 0;

    case ["seeds", var dir]:
        Seeds.WriteCorpus(dir);
        return 0;

    case ["fuzz", var name]:
    {
        var target = FuzzTargets.Named(name);
        using var workspace = FuzzWorkspace.Create();
        // In process: each input is read whole (inputs are small) and run; an escaping FuzzFailure is AFL++'s crash.
        Fuzzer.Run(stream =>
        {
            using var copy = new MemoryStream();
            stream.CopyTo(copy);
            FuzzTargets.Run(target, workspace, copy.ToArray());
        });
        return 0;
    }

    case ["replay", var name, .. var paths] when paths.Length > 0:
    {
        var target = FuzzTargets.Named(name);
        using var workspace = FuzzWorkspace.Create();
        int failed = 0, count = 0, accepted = 0;
        foreach (var file in paths.SelectMany(p => Directory.Exists(p) ? Directory.EnumerateFiles(p).Order(StringComparer.Ordinal) : (IEnumerable<string>)[p]))
        {
            count++;
            try { if (FuzzTargets.Run(target, workspace, File.ReadAllBytes(file))) accepted++; }
            catch (FuzzFailure e) { failed++; Console.WriteLine($"{file}: {e.Message}\n{e.InnerException?.StackTrace}"); }
        }
        Console.WriteLine($"{name}: {count} inputs, {accepted} accepted, {count - accepted - failed} rejected, {failed} crashed");
        return failed == 0 ? 0 : 1;
    }

    default:
        Console.Error.WriteLine("usage: anyprec-fuzz list | seeds <dir> | fuzz <target> | replay <target> <file-or-dir>...");
        return 2;
}
